//! The simulated world: sports, leagues, teams (fictional, with stable ids) and their squads.

use super::rng::Rng;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sport {
    Football,
    Basketball,
}

impl Sport {
    /// The `{sport}` segment of channel names and the `sport_id` field.
    pub fn slug(self) -> &'static str {
        match self {
            Sport::Football => "football",
            Sport::Basketball => "basketball",
        }
    }
}

pub struct League {
    pub sport: Sport,
    /// The `{league}` segment of channel names and the `league_id` field.
    pub slug: &'static str,
    /// Team ids are `first_team_id + index in teams`.
    pub first_team_id: u64,
    pub teams: &'static [&'static str],
    /// Basketball: minutes per quarter (NBA 12, EuroLeague 10); football: 45 per half.
    pub period_minutes: u64,
    /// Mean goals (football) or points (basketball) per team per match, before strength.
    pub mean_score: f64,
    pub spanish_names: bool,
}

pub static LEAGUES: [League; 4] = [
    League {
        sport: Sport::Football,
        slug: "premier-league",
        first_team_id: 101,
        teams: &[
            "Kingsport Rovers",
            "Ashford City",
            "Blackmoor Athletic",
            "Redbridge United",
            "Westhaven Town",
            "Northgate Albion",
            "Calder Valley",
            "Harrow Park Rangers",
            "Stonebury Wanderers",
            "Eastfield County",
            "Millbrook Villa",
            "Southport Harbour",
        ],
        period_minutes: 45,
        mean_score: 1.35,
        spanish_names: false,
    },
    League {
        sport: Sport::Football,
        slug: "la-liga",
        first_team_id: 201,
        teams: &[
            "Real Costa Azul",
            "Atlético Valdemar",
            "CD Sierra Norte",
            "Deportivo Alcaraz",
            "UD Puerto Blanco",
            "Racing Montaña",
            "CF Los Olivos",
            "Sporting Arenal",
            "Real Vistamar",
            "CD Castillejo",
            "Unión Riberas",
            "Atlético Peñalta",
        ],
        period_minutes: 45,
        mean_score: 1.3,
        spanish_names: true,
    },
    League {
        sport: Sport::Basketball,
        slug: "nba",
        first_team_id: 301,
        teams: &[
            "Bayview Comets",
            "Iron Valley Miners",
            "Coral Bay Sharks",
            "Summit Peaks",
            "Capital Senators",
            "Lakeshore Lynx",
            "Harbor City Pilots",
            "Prairie Mustangs",
            "Granite Falls Giants",
            "Riverside Rapids",
            "Midtown Monarchs",
            "Red Mesa Scorpions",
        ],
        period_minutes: 12,
        mean_score: 113.0,
        spanish_names: false,
    },
    League {
        sport: Sport::Basketball,
        slug: "euroleague",
        first_team_id: 401,
        teams: &[
            "Virtus Altamura",
            "Dinamo Karst",
            "Crvena Zora",
            "Marmara Anadolu",
            "Real Bastida",
            "Alba Havelland",
            "Olympos Kalamaki",
            "Maccabi Yarden",
            "Partizan Sava",
            "Baltija Kaunas",
            "Lyon Rhône Basket",
            "Aris Thermaikos",
        ],
        period_minutes: 10,
        mean_score: 81.0,
        spanish_names: false,
    },
];

#[derive(Clone, Debug)]
pub struct Team {
    pub id: u64,
    pub name: &'static str,
    /// Starters first (11 in football, 5 in basketball), then the bench.
    pub squad: Vec<String>,
}

impl League {
    pub fn team(&self, index: usize, seed: u64) -> Team {
        let id = self.first_team_id + index as u64;
        let (starters, bench) = match self.sport {
            Sport::Football => (11, 9),
            Sport::Basketball => (5, 7),
        };
        Team {
            id,
            name: self.teams[index],
            squad: squad(seed, id, starters + bench, self.spanish_names),
        }
    }

    pub fn starters(&self) -> usize {
        match self.sport {
            Sport::Football => 11,
            Sport::Basketball => 5,
        }
    }
}

const FIRST: &[&str] = &[
    "James", "Oliver", "Harry", "Jack", "Leo", "Noah", "Ethan", "Liam", "Mason", "Lucas", "Daniel",
    "Samuel", "Ryan", "Marcus", "Tyler", "Jordan", "Kevin", "Andre", "Luka", "Nikola", "Dario",
    "Jonas", "Mikkel", "Tomas", "Emil", "Victor", "Isaac", "Caleb", "Malik", "Darius", "Julian",
    "Kofi", "Theo", "Adam", "Felix", "Owen",
];
const LAST: &[&str] = &[
    "Smith",
    "Carter",
    "Walker",
    "Hughes",
    "Bennett",
    "Fletcher",
    "Morgan",
    "Reid",
    "Hayes",
    "Brooks",
    "Turner",
    "Price",
    "Coleman",
    "Jensen",
    "Novak",
    "Petrović",
    "Kovač",
    "Andersen",
    "Müller",
    "Okafor",
    "Mensah",
    "Dubois",
    "Laurent",
    "Rossi",
    "Bianchi",
    "Silva",
    "Costa",
    "Nowak",
    "Horvat",
    "Lindqvist",
    "Whitfield",
    "Ashworth",
    "Donovan",
    "Gallagher",
    "Banks",
    "Holloway",
    "Sutton",
    "Ellison",
];
const FIRST_ES: &[&str] = &[
    "Alejandro",
    "Pablo",
    "Sergio",
    "Javier",
    "Diego",
    "Álvaro",
    "Iker",
    "Hugo",
    "Mario",
    "Adrián",
    "Raúl",
    "Dani",
    "Marcos",
    "Rubén",
    "Iván",
    "Jorge",
    "Unai",
    "Carlos",
    "Gonzalo",
    "Nico",
];
const LAST_ES: &[&str] = &[
    "García",
    "Fernández",
    "López",
    "Martínez",
    "Sánchez",
    "Romero",
    "Navarro",
    "Torres",
    "Domínguez",
    "Vázquez",
    "Ramos",
    "Gil",
    "Serrano",
    "Molina",
    "Ortega",
    "Delgado",
    "Castro",
    "Iglesias",
    "Herrera",
    "Medina",
    "Aguirre",
    "Etxeberria",
];

/// A team's squad: the same for a (seed, team) pair, whatever else the run draws.
fn squad(seed: u64, team_id: u64, n: usize, spanish: bool) -> Vec<String> {
    let mut rng = Rng::derive(seed, team_id);
    let mut out: Vec<String> = Vec::with_capacity(n);
    while out.len() < n {
        let name = if spanish && !rng.chance(0.25) {
            format!("{} {}", rng.pick(FIRST_ES), rng.pick(LAST_ES))
        } else {
            format!("{} {}", rng.pick(FIRST), rng.pick(LAST))
        };
        if !out.contains(&name) {
            out.push(name);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn team_ids_are_unique_across_leagues_and_squads_stable() {
        let mut ids = std::collections::HashSet::new();
        for l in &LEAGUES {
            for i in 0..l.teams.len() {
                let t = l.team(i, 3);
                assert!(ids.insert(t.id), "duplicate team id {}", t.id);
                assert_eq!(t.squad, l.team(i, 3).squad);
                assert!(t.squad.len() > l.starters());
            }
        }
    }
}
